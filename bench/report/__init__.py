"""Result tables and W&B logging."""
