"""The ``privacy:`` section of round.yaml: client-level differential privacy and secure
aggregation. Everything is off by default.

docs/PRIVACY.md states the mechanisms, the threat model and why each epsilon is correct; the
field descriptions below say what each knob means in one line.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DPSection(_Section):
    """Client-level DP: each client's model update is clipped to ``clip`` (L2, in the space of
    the model update: ``Method.update_geometry``) and Gaussian noise of std ``z * clip`` per
    coordinate is added to the *sum* of a round's updates (central: by the server) or to each
    update (local: by its client). The aggregate divides by ``rounds.clients_per_round``, a
    fixed denominator, so one client changes the released sum by at most 2 * clip under
    replacement of its data (the adjacency the accountant uses)."""

    mode: Literal["off", "central", "local"] = Field(
        "off", description="off; central: the server noises the round's sum; local: every client noises its own")
    clip: float = Field(1.0, gt=0, description="C: bound on the L2 norm of one client's model update per round")
    noise_multiplier: float | None = Field(
        None, gt=0, description="z: noise std per coordinate is z * C (give this or target_epsilon)")
    target_epsilon: float | None = Field(
        None, gt=0, description="calibrate z so that rounds.total rounds end at this epsilon (for delta)")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta epsilon is reported for")
    epsilon_budget: float | None = Field(
        None, gt=0, description="the run stops, saving the model, before a round would take epsilon past this")
    amplification: bool = Field(
        False, description="central mode: clients are selected with secret randomness and the accountant credits "
        "sampling without replacement (q = clients_per_round / the clients that asked for work); false: no sampling credit (q = 1)")
    population: int | None = Field(
        None, ge=1, description="with amplification and target_epsilon: the clients the run will sample from "
        "(planned q = clients_per_round / population); the accountant always charges each round at the size of the pool it was drawn from")

    @property
    def enabled(self) -> bool:
        """Whether client-level DP is on (``mode`` is not ``off``)."""
        return self.mode != "off"

    @model_validator(mode="after")
    def _consistent(self) -> DPSection:
        if not self.enabled:
            return self
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        if self.amplification and self.mode != "central":
            raise ValueError("amplification applies to central mode only (in local mode the server sees who sent)")
        if self.amplification and self.target_epsilon is not None and self.population is None:
            raise ValueError("target_epsilon with amplification needs population (the planned sampling rate)")
        return self


class SecureAggregationSection(_Section):
    """Pairwise-masked sums (SecAgg, Bonawitz et al. 2017): the server learns the sum of a
    round's updates and nothing about any single one, and recovers from dropouts while at
    least ``threshold`` of the clients that shared keys remain."""

    enabled: bool = Field(False, description="clients send pairwise-masked updates: the server learns each round's "
                          "sum and nothing about any single update (docs/PRIVACY.md section 2)")
    threshold: float = Field(
        0.5, lt=1, description="t = floor(threshold * n) + 1 of the n clients that advertised keys "
        "(at least 2; the fraction at least 0.5): fewer colluders than t learn nothing, fewer survivors "
        "than t fail the round; each client refuses a smaller t than its own fraction of the roster")
    value_bound: float = Field(
        1.0, gt=0, description="B: every uploaded value is clamped to [-B, B] before fixed-point encoding "
        "(counted in the log when it bites); sets the fixed-point step with clients_per_round and ring_bits")
    ring_bits: Literal[32, 64] = Field(
        32, description="masked values live in integers mod 2^ring_bits: 32 keeps the upload at float32's size")
    phase_timeout_s: float = Field(
        60.0, gt=0, description="how long each key or unmasking phase waits for the clients of the previous one")

    @field_validator("threshold")
    @classmethod
    def _majority(cls, value: float) -> float:
        """Below one half, 2t <= n: a server that tells one half of the clients that u survived
        and the other half that u dropped gets t shares of u's seed and t of its mask key from
        clients that each revealed only one, and reads u's input."""
        if value < 0.5:
            raise ValueError(f"threshold {value:g} is below 0.5: with 2t <= n a server that lies about who "
                             "dropped can rebuild both secrets of a client and read its input")
        return value


class DPSGDSection(_Section):
    """Sample-level DP inside each client (DP-SGD, Abadi et al. 2016): every local step draws a
    Poisson sample of the client's rows (rate q = training.batch_size / its rows), clips each
    example's gradient of everything the step trains to ``clip`` (L2, jointly), adds Gaussian
    noise of std ``noise_multiplier * clip`` to the sum and divides by the expected batch size.
    Per-example gradients come from Opacus (FedKRSO's B from its own fused layer). It protects
    one example of a client's data against everything downstream of that client's training,
    the server and the released model included; client-level DP (``dp``) protects a whole
    client and composes with it."""

    enabled: bool = Field(False, description="train every local step with DP-SGD (per-example clip and noise); "
                          "each client also keeps its own ledger of what its data released")
    clip: float = Field(1.0, gt=0, description="C: bound on the L2 norm of one example's gradient per step")
    noise_multiplier: float = Field(
        1.0, gt=0, description="sigma: the noise std on each step's summed gradient is sigma * C")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta the sample-level epsilon is reported for")
    epsilon_budget: float | None = Field(
        None, gt=0, description="the run stops, saving the model, before a round would take a selected client's "
        "sample-level epsilon past this")


class PrivacySection(_Section):
    """The privacy modes of a run. Under any of them (``any``) the server writes no client's
    name next to a round and no client's own figure (docs/PRIVACY.md section 4)."""

    dp: DPSection = DPSection()
    dp_sgd: DPSGDSection = DPSGDSection()
    secure_aggregation: SecureAggregationSection = SecureAggregationSection()

    @property
    def any(self) -> bool:
        """Whether any privacy mode is on (DP, DP-SGD or secure aggregation): then per-client figures
        stay out of the server's view (docs/PRIVACY.md section 4)."""
        return self.dp.enabled or self.dp_sgd.enabled or self.secure_aggregation.enabled
