"""Planning: turn a job spec (and a cluster) into a frozen ParallelPlan."""

from shipyard.plan.plan import Candidate, Estimate, ParallelPlan, RankPlan, candidates, make_plan

__all__ = ["Candidate", "Estimate", "ParallelPlan", "RankPlan", "candidates", "make_plan"]
