"""Data prep as steps that scale out over pods: plan -> N workers -> dedup reducers -> cluster -> N packers -> merge.

One process runs them all (`run_local`), or N local processes, or a pipeline one pod per task (component.py); the
steps share nothing but storage under `<output>/_work`, and the output is the same for every N (docs/stages/data-prep.md:
"Beyond one machine"). Every step can be rerun: finished work is found and kept.
"""
from kubellama.components.data_prep.steps.dedup import cluster_step, dedup_step, reduce_partition
from kubellama.components.data_prep.steps.local import run_local
from kubellama.components.data_prep.steps.merge import merge_step, spread, worker_metrics
from kubellama.components.data_prep.steps.packer import pack_group, pack_step
from kubellama.components.data_prep.steps.workdir import WORK, cleanup_step, plan_step, reusable, shared_work
from kubellama.components.data_prep.steps.worker import input_errors, partition_file, worker_step

__all__ = ["WORK", "cleanup_step", "cluster_step", "dedup_step", "input_errors", "merge_step", "pack_group",
           "pack_step", "partition_file", "plan_step", "reduce_partition", "reusable", "run_local", "shared_work",
           "spread", "worker_metrics", "worker_step"]
