"""Planning m-hyperparameters under a memory budget, and the online retraining loop.

:func:`plan` asks a predictor (local or remote, anything with ``predict(cg, configs)``)
for every candidate configuration and ranks those that fit; the retraining loop
(:mod:`aiop.mpopt.loop`) trains with the plan for real on a stream of drifting domains.
"""

from aiop.mpopt.planner import (
    Candidate,
    PlanError,
    PlanResult,
    PredictorLike,
    accuracy_prior,
    default_space,
    plan,
    plan_model,
)

__all__ = [
    "Candidate",
    "PlanError",
    "PlanResult",
    "PredictorLike",
    "accuracy_prior",
    "default_space",
    "plan",
    "plan_model",
]
