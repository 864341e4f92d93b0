"""Planning: turn a job spec (and later a cluster) into a frozen ParallelPlan."""

from shipyard.plan.plan import ParallelPlan, make_plan

__all__ = ["ParallelPlan", "make_plan"]
