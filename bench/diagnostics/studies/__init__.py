"""Studies that test published claims about collapse and transfer on small, generated or digits settings."""
