"""SLURM batch jobs for training: 1 node x N GPUs, or several nodes, with auto-requeue.

    python -m diffurec_lightning.launch.slurm --data toys --gpus 4 --nodes 1 [overrides]
    make slurm DATA=toys GPUS=4 NODES=1                 # the same, through the Makefile

The generated script starts one task per device with ``srun`` (Lightning's SLURMEnvironment
takes ranks and world size from SLURM; a plain ``python`` in a multi-task job would hang waiting
for ranks that never start). ``--signal=SIGUSR1@<lead>`` asks SLURM for SIGUSR1 before the time
limit; the SlurmRequeue callback (launch/requeue.py, in the default callbacks) has every rank
save ``hpc_ckpt_<n>.ckpt`` into the run folder at the next shared step and runs ``scontrol
requeue`` (Lightning's own handler, which can deadlock DDP ranks, is switched off). The run folder
is keyed by the job id, which a requeued job keeps, and ``ckpt_path=auto`` resumes from the newest
checkpoint in it; the W&B run id is derived from the job id as well, so the requeued job continues
the same W&B run (WandbLogger resumes with resume="allow").
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from diffurec_lightning.config import compose_config
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.io import write_text

RUN_DIR = "${paths.root_dir}/outputs/slurm/${oc.env:SLURM_JOB_ID}_${data.name}_${model.name}"
# SLURM job ids repeat across clusters; the cluster name keeps W&B run ids apart.
WANDB_ID = "slurm-${oc.env:SLURM_CLUSTER_NAME,local}-${oc.env:SLURM_JOB_ID}"
# The signal may come up to 60 s early (sbatch(1)), and Lightning must have installed its
# handler by then (imports, data, DDP start-up take a minute or two).
MIN_MARGIN_S = 180


@dataclass(frozen=True)
class SlurmJob:
    """What to train and on which resources; ``gpus_per_node=0`` runs CPU tasks instead."""

    data: str = "toys"
    model: str = "diffurecsys"
    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int | None = None  # CPU jobs only: DDP processes per node
    cpus_per_task: int = 8
    mem: str | None = None
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    signal_lead_s: int = 90
    job_name: str | None = None
    python: str = sys.executable
    workdir: Path = field(default_factory=Path.cwd)
    sbatch_args: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()

    @property
    def devices(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else (self.tasks_per_node or 1)

    @property
    def name(self) -> str:
        return self.job_name or f"diffurec-{self.data}-{self.model}"

    @property
    def root(self) -> Path:
        """Base of outputs/ (DIFFUREC_HOME, as conf/paths uses it, else the project folder)."""
        return Path(os.environ.get("DIFFUREC_HOME") or self.workdir).resolve()

    @property
    def log_dir(self) -> Path:
        return self.root / "outputs" / "slurm" / "logs"

    def validate(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpus_per_task < 1:
            raise ConfigError("need --nodes >= 1, --gpus >= 0 (0 = CPU) and --cpus-per-task >= 1")
        if self.tasks_per_node is not None and self.gpus_per_node > 0:
            raise ConfigError("with GPUs there is one task per GPU: drop --tasks-per-node")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ConfigError(f"--tasks-per-node must be >= 1, got {self.tasks_per_node}")
        limit = time_limit_seconds(self.time)
        if limit < self.signal_lead_s + MIN_MARGIN_S:
            raise ConfigError(
                f"--time {self.time} leaves under {MIN_MARGIN_S} s before the requeue signal "
                f"(--signal-lead {self.signal_lead_s}); ask for more time"
            )


def time_limit_seconds(value: str) -> int:
    """Seconds in a SLURM time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not match:
        raise ConfigError(f"--time {value!r}: use HH:MM:SS or D-HH:MM:SS (SLURM's formats)")
    days, first, second, third = (int(part) if part else 0 for part in match.groups())
    if match.group(1) or match.group(4):  # D-H[:M[:S]] or H:M:S
        hours, minutes, seconds = first, second, third
    else:  # M or M:S
        hours, minutes, seconds = 0, first, second
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def train_overrides(job: SlurmJob) -> list[str]:
    """Hydra overrides of the training command: hardware from the job, the user's last.

    Composing them here rejects a bad override now, not after hours in the queue.
    """
    world = job.nodes * job.devices
    overrides = [
        f"data={job.data}",
        f"model={job.model}",
        "trainer=gpu" if job.gpus_per_node > 0 else "trainer=cpu",
        f"trainer.devices={job.devices}",
        f"trainer.num_nodes={job.nodes}",
        f"trainer.strategy={'ddp' if world > 1 else 'auto'}",
        f"hydra.run.dir={RUN_DIR}",
        "ckpt_path=auto",
        # The callback compares the lead with the validation time it measures.
        f"callbacks.slurm_requeue.signal_lead_s={job.signal_lead_s}",
    ]
    try:
        cfg = compose_config([*overrides, *job.overrides])
    except Exception as exc:  # Hydra's message names the bad override
        raise ConfigError(f"bad training overrides: {str(exc).splitlines()[0]}") from exc
    if cfg.get("logger") and cfg.logger.get("wandb"):
        overrides.append(f"logger.wandb.id={WANDB_ID}")
    return [*overrides, *job.overrides]


def render(job: SlurmJob) -> str:
    """The sbatch script for ``job``."""
    job.validate()
    overrides = " ".join(shlex.quote(item) for item in train_overrides(job))
    python = shlex.quote(job.python)
    options = [
        f"--job-name={job.name}",
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={job.devices}",  # == trainer.devices: one task per device
        *([f"--gres=gpu:{job.gpus_per_node}"] if job.gpus_per_node > 0 else []),
        f"--cpus-per-task={job.cpus_per_task}",
        *([f"--mem={job.mem}"] if job.mem else []),
        f"--time={job.time}",
        *([f"--partition={job.partition}"] if job.partition else []),
        *([f"--account={job.account}"] if job.account else []),
        f"--signal=SIGUSR1@{job.signal_lead_s}",
        "--requeue",
        "--open-mode=append",  # one log across requeues
        f"--output={job.log_dir}/%x-%j.out",
        f"--chdir={job.workdir.resolve()}",
        *job.sbatch_args,
    ]
    hardware = (
        f"{job.gpus_per_node} GPU(s)" if job.gpus_per_node > 0 else f"{job.devices} CPU task(s)"
    )
    lines = [
        "#!/bin/bash",
        f"# {job.data} / {job.model}: {job.nodes} node(s) x {hardware}.",
        "# Written by diffurec_lightning.launch.slurm; requeued jobs rerun it and resume.",
        *(f"#SBATCH {option}" for option in options),
        "set -euo pipefail",
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        "# sbatch exports the submitting shell's environment. A W&B service token in it (set in any",
        "# process that ran wandb, e.g. a notebook) would make every attempt log through that one",
        "# service, and a requeued attempt would find its run id still held by the killed one.",
        "unset WANDB_SERVICE",
        'echo "job ${SLURM_JOB_ID}: start ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}"',
        "# Prepare the data once, before the ranks start (they would race on the cache).",
        f"{python} -m diffurec_lightning.data.prepare {overrides}",
        "# One process per device; Lightning reads the ranks and world size from SLURM.",
        f"srun --kill-on-bad-exit=1 {python} -m diffurec_lightning.train {overrides}",
    ]
    return "\n".join(lines) + "\n"


def write_script(job: SlurmJob, path: Path | None = None) -> Path:
    """Write the script (atomically) to ``path`` or outputs/slurm/scripts/; create the log dir."""
    text = render(job)
    if path is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = job.root / "outputs" / "slurm" / "scripts" / f"{job.name}-{stamp}.sbatch"
    job.log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create it
    return write_text(path, text, mode=0o755)


def submit(script: Path) -> str:
    """``sbatch`` the script; return the job id."""
    if shutil.which("sbatch") is None:
        raise ConfigError(f"sbatch not found: submit {script} from a SLURM login node")
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"sbatch rejected {script}: {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffurec_lightning.launch.slurm",
        description="Write an sbatch script for DDP training with auto-requeue, and submit it.",
    )
    parser.add_argument("--data", default="toys", help="data config (conf/data/)")
    parser.add_argument("--model", default="diffurecsys", help="model config (conf/model/)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per node; 0 = CPU tasks")
    parser.add_argument("--tasks-per-node", type=int, help="CPU jobs: DDP processes per node")
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--mem", help="memory per node, e.g. 64G (default: the cluster's)")
    parser.add_argument("--time", default="24:00:00", help="time limit (HH:MM:SS, D-HH:MM:SS)")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--signal-lead", type=int, default=90, help="seconds before the limit")
    parser.add_argument("--job-name")
    parser.add_argument(
        "--sbatch-arg", action="append", default=[], help="extra sbatch option, repeatable"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter on the nodes")
    parser.add_argument("--output", type=Path, help="where to write the script")
    parser.add_argument("--dry-run", action="store_true", help="write and print, do not submit")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_epochs=5")
    args = parser.parse_args(argv)
    job = SlurmJob(
        data=args.data,
        model=args.model,
        nodes=args.nodes,
        gpus_per_node=args.gpus,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        time=args.time,
        partition=args.partition,
        account=args.account,
        signal_lead_s=args.signal_lead,
        job_name=args.job_name,
        python=args.python,
        sbatch_args=tuple(args.sbatch_arg),
        overrides=tuple(args.overrides),
    )
    try:
        script = write_script(job, args.output)
        if args.dry_run:
            print(script.read_text(), end="")
            print(f"# written to {script}", file=sys.stderr)
            return 0
        job_id = submit(script)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"submitted job {job_id}: {script}")
    print(f"  log:  {job.log_dir}/{job.name}-{job_id}.out")
    print(f"  runs: {job.root}/outputs/slurm/{job_id}_{job.data}_{job.model}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
