"""Talking between ranks: phases that fail the same way on every rank, typed messages, and naming lost ranks.

`phases` runs each step of a save or load as a phase ending in one exchange (gather to rank 0, one decision
back); `messages` holds the frozen dataclasses that cross ranks and their one codec; `peers` keeps the records
that let survivors name a rank that hung or died.
"""

from __future__ import annotations

from .phases import Communicator, Decision, Gathered, Kept, PhaseStats

__all__ = ["Communicator", "Decision", "Gathered", "Kept", "PhaseStats"]
