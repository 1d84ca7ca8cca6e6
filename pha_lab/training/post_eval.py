"""`post_eval:` in a sweep file: evaluations run on each trial's run right after it trained, logged to that run.

The sweep runner calls `post_evaluate` once per trial, after `train` returned; a kind of evaluation is one optional
section of `PostEval` (today: `long_context`, pha_lab.training.long_context), checked with the sweep's cells.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from pha_lab import tracking
from pha_lab.training.long_context import LongContextSpec, evaluate_long_context


@dataclass
class PostEval:
    """Evaluations a sweep runs on each trial's run right after it trained (a sweep file's `post_eval:`), logged to
    that run; one optional section per kind of evaluation."""

    long_context: LongContextSpec | None = None  # pha_lab.training.long_context

    def check(self, cfg: DictConfig | None = None) -> None:
        """Refuse bad values; with a trial's config, also what does not fit it (an MQAR run, a stride > context)."""
        if self.long_context is not None:
            self.long_context.check("post_eval.long_context")
            if cfg is not None:
                self.long_context.contexts_for(cfg)


def post_evaluate(post: PostEval, run_id: str, tracking_cfg: DictConfig) -> None:
    """Run the `post_eval` evaluations on a trained run (the sweep runner calls this after `train`). A failure
    raises, naming the run, which is trained and checkpointed by then and can be evaluated again by hand."""
    if post.long_context is None:
        return
    where = [
        f"tracking.runs_dir={tracking_cfg.runs_dir}",
        f"tracking.tracking_uri={tracking.tracking_uri(tracking_cfg)}",
    ]
    try:
        evaluate_long_context(run_id, where, post.long_context)
    except Exception as exc:
        raise RuntimeError(
            f"post_eval.long_context failed on run {run_id} ({type(exc).__name__}: {exc}); the run "
            f"is trained and checkpointed: evaluate it with `pha-lab eval {run_id} --by-position "
            f"...`"
        ) from exc
