"""Adaptive entropy bonus: a controller that keeps the policy's entropy near a target."""

from __future__ import annotations


class EntropyController:
    """Integral controller of the entropy-bonus coefficient α in ``loss − α·H``.

        α ← clip(α + lr · (H_target − H), 0, α_max)

    where H is the mean per-token entropy (nats) measured over the last update. Below the target α
    grows (more exploration), above it α shrinks back toward 0, so the bonus acts only while the
    policy is collapsing. With ``target=None`` α stays fixed (the plain entropy bonus).

    Skywork-OR1 (https://arxiv.org/abs/2505.22312, §3.2.4; TRL's ``use_adaptive_entropy``) moves α
    by a constant step ``±Δ`` on the sign of ``H_target − H`` and applies it only when H is at or
    below the target; this one moves α in proportion to the gap, so it settles where a constant α
    holds the entropy at the target. ``value`` is the whole state (checkpointed for exact resume).
    """

    def __init__(
        self, init_coef: float, target: float | None = None, lr: float = 0.0, max_coef: float = 1.0
    ) -> None:
        if init_coef < 0 or lr < 0 or max_coef < 0:
            raise ValueError(
                f"EntropyController: init_coef, lr and max_coef must be >= 0, got {init_coef}, {lr}, {max_coef}"
            )
        self.value = float(init_coef)
        self.target = None if target is None else float(target)
        self.lr = float(lr)
        self.max_coef = float(max_coef)

    @property
    def adaptive(self) -> bool:
        return self.target is not None

    def update(self, entropy: float) -> float:
        """Move α toward the coefficient that holds ``entropy`` (nats per token) at the target; returns α.
        A NaN entropy (no token measured) leaves α unchanged."""
        if self.target is not None and entropy == entropy:
            self.value = min(max(self.value + self.lr * (self.target - float(entropy)), 0.0), self.max_coef)
        return self.value
