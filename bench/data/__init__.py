"""Data: few-shot episodes, task suites, dataset sources and LightningDataModules."""

from bench.data.episodes import Episode, sample_episode, select_classes
from bench.data.tasks import TaskSuite

__all__ = ["Episode", "TaskSuite", "sample_episode", "select_classes"]
