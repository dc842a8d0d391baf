"""Many sequences in one cache: the Engine executes, the Scheduler plans, the PrefixCache remembers.

Imports go one way: engine -> runtime, never back.
"""
from .engine import Engine, StepOutput
from .requests import Request
from .sequence import Nodes, Sequence, TreeSequence

__all__ = ["Engine", "StepOutput", "Request", "Nodes", "Sequence", "TreeSequence"]
