"""What start-up decided from the config as given and the world it runs in, in one frozen record.

The config stays as the user gave it (validated, and completed with what the world size implies: ``model_num``,
``replicas: auto``, ``experiment_name``); what the run does with it lives here: the trainer and the step read
these fields, and the summary and checkpoints record them beside the config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Resolved:
    amp: str  # off | bf16 | fp16 (rank 0's): mixed precision applies on GPUs only
    exchange: str  # all_gather | all_reduce
    exchange_why: str
    channels_last: tuple[bool, ...]  # per peer: its model's memory format
    channels_last_why: tuple[str, ...]
    resume: str | None  # auto | a path | None: "auto" after a torchrun restart when the config said nothing
    data_path: str  # memory | stream | sample
    data_why: str
    layout: tuple[int, ...]  # replicas per peer
    rank_order: str  # peer | replica
    normalize: tuple = ()  # per peer: [mean, std] its inputs are normalised with
    normalize_why: tuple[str, ...] = ()
    init_from: tuple = ()  # per peer: where its weights came from (weights.load_init's record), or None
    frozen: tuple[bool, ...] = ()  # per peer: a teacher that predicts and never steps
    compile: tuple = ()  # per peer: torch.compile's mode, or None (eager)
    compile_why: tuple[str, ...] = ()

    def record(self) -> dict:
        """The summary's and the checkpoints' form: plain lists and strings. ``resume`` says how a process
        started, not what was trained (the run facts list the resumes), so it is left out, as from the config."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "resume"}
