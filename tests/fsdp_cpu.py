"""Run the trainer core under accelerate's own FSDP2 path on CPU processes (gloo): ``torchrun --nproc_per_node 2``.

accelerate applies its FSDP plugin only to GPU processes (on CPU ``accelerate launch --use_fsdp`` stops with
"AcceleratorState has no attribute fsdp_plugin"). :func:`cpu_fsdp2_accelerator` builds a CPU ``Accelerator`` and
switches its state to FSDP with an FSDP2 plugin, so ``prepare`` / ``save_state`` / ``load_state`` /
``get_state_dict`` run accelerate's FSDP2 code (``fully_shard`` with the plugin's wrap policy, DTensor
optimizer states, sharded or full state dicts) exactly as they would on GPUs, over gloo.

In one launch, DMD2 with the GAN head (generator with an EMA, fake-score critic with its head) on the tiny teacher:

1. ``straight``: 2 iterations sharded, a sharded-state-dict checkpoint after iteration 1, sample grid, export;
2. ``resumed``: ``--resume_from_checkpoint`` that checkpoint, to iteration 2;
3. ``ddp``: the same 2 iterations without sharding (multi-process data parallel);
4. LoRA mode (``lora_rank > 0``) under FSDP must be refused with a clear error.

The main process writes ``fsdp_result.json`` (hashes of the gathered weights and EMA weights, the largest
difference between the sharded and the DDP weights, per-process checksums, checkpoint files, whether the
exported student is the gathered EMA generator, the LoRA refusal); ``tests/test_fsdp.py`` checks it.
``... fsdp_cpu.py TEACHER OUT lora-probe`` instead runs the toy method in LoRA mode with the refusal bypassed and
reports what FSDP2 does to the adapters (the reason for the refusal).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from toy_trainer import ToyConfig, ToyTrainer

from stepdistill.trainers.base import DistillationTrainer


def cpu_fsdp2_accelerator(state_dict_type: str = "SHARDED_STATE_DICT", **plugin: object) -> Accelerator:
    """A CPU ``Accelerator`` whose state is accelerate's FSDP2, by default each ``ResnetBlock2D`` an FSDP unit."""
    accelerator = Accelerator(cpu=True)
    plugin = plugin or dict(auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["ResnetBlock2D"])
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=state_dict_type, **plugin)
    _set_distributed_type(DistributedType.FSDP)
    AcceleratorState().fsdp_plugin = plugin
    return _keep_process_group(accelerator)


def _keep_process_group(accelerator: Accelerator) -> Accelerator:
    """``end_training`` would destroy the process group; several trainings share it here."""
    accelerator.end_training = lambda: None
    return accelerator


def _set_distributed_type(kind: DistributedType) -> None:
    AcceleratorState._shared_state["distributed_type"] = kind
    PartialState._shared_state["distributed_type"] = kind


def _digest(trainer: DistillationTrainer) -> tuple[str, dict[str, torch.Tensor]]:
    """A hash of every trainable's gathered weights and EMA weights (collective), and the weights (main)."""
    weights = {}
    for name in trainer.trainables:
        weights.update({f"{name}.{k}": v for k, v in trainer.gathered_state_dict(name).items()})
        weights.update({f"{name}.ema.{k}": v for k, v in trainer.gathered_state_dict(name, ema=True).items()})
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode() + weights[key].float().numpy().tobytes())
    return digest.hexdigest(), weights


def _dmd(teacher: str, out: Path, accelerator: Accelerator, **overrides) -> DistillationTrainer:
    """Train DMD2 + GAN head for 2 iterations (a checkpoint after 1), with its grid and export."""
    from stepdistill.trainers import DMDConfig, DMDTrainer

    settings = dict(teacher=teacher, output_dir=str(out), max_train_steps=2, train_batch_size=2,
                    generator_learning_rate=1e-3, critic_learning_rate=1e-3, lr_warmup_steps=0, use_ema=True,
                    critic_updates_per_generator_update=1, use_gan=True, gan_generator_loss_weight=1e-2,
                    checkpointing_steps=1, checkpoints_total_limit=0, log_every=1, eval_num_samples=0,
                    sample_grid_size=2, seed=3, num_threads=1, cpu=True)  # fmt: skip
    trainer = DMDTrainer(DMDConfig(**{**settings, **overrides}), accelerator=accelerator)
    trainer.summary = trainer.train()
    return trainer


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(teacher: str, out: Path) -> None:
    """Run the trainings and write the comparison (see the module docstring)."""
    straight = _dmd(teacher, out / "straight", cpu_fsdp2_accelerator())
    hashes = {}
    hashes["straight"], fsdp_weights = _digest(straight)
    sharded_types = sorted({type(straight.unwrap(n)).__name__ for n in straight.trainables})
    checkpoint = out / "straight" / "checkpoints" / "checkpoint-000001"
    resumed = _dmd(teacher, out / "resumed", cpu_fsdp2_accelerator(), resume_from_checkpoint=str(checkpoint),
                   export=False)
    hashes["resumed"], _ = _digest(resumed)
    try:
        ToyTrainer(ToyConfig(teacher=teacher, output_dir=str(out / "lora"), lora_rank=2, cpu=True),
                   accelerator=cpu_fsdp2_accelerator())
        lora_refusal = None
    except ValueError as err:
        lora_refusal = str(err)
    _set_distributed_type(DistributedType.MULTI_CPU)
    ddp = _dmd(teacher, out / "ddp", _keep_process_group(Accelerator(cpu=True)), export=False, checkpointing_steps=0)
    hashes["ddp"], ddp_weights = _digest(ddp)
    if not ddp.accelerator.is_main_process:
        return
    from safetensors.torch import load_file

    exported = load_file(str(out / "straight" / "student" / "unet" / "diffusion_pytorch_model.safetensors"))
    ema = {k[len("generator.ema.model."):]: v for k, v in fsdp_weights.items() if k.startswith("generator.ema.model.")}
    record = {
        "hashes": hashes,
        "max_abs_diff_fsdp_vs_ddp": _max_diff(fsdp_weights, ddp_weights),
        "sharded_types": sharded_types,
        "param_checksums": straight.summary["param_checksums"],
        "checkpoint_files": sorted(p.name for p in checkpoint.iterdir()),
        "ema_checkpoint": sorted(str(p.relative_to(checkpoint)) for p in (checkpoint / "generator").rglob("*")),
        "export_equals_gathered_ema": sorted(exported) == sorted(ema)
        and all(torch.equal(exported[k], ema[k]) for k in exported),
        "grid": (out / "straight" / "samples" / "step-000002.png").is_file(),
        "losses": straight.summary["final_metrics"],
        "lora_refusal": lora_refusal,
    }
    (out / "fsdp_result.json").write_text(json.dumps(record, indent=2) + "\n")


def lora_probe(teacher: str, out: Path) -> None:
    """LoRA mode under FSDP2 with the refusal bypassed: does any LoRA weight of the shared network change?"""
    DistillationTrainer._check_shardable = lambda self: None
    config = ToyConfig(teacher=teacher, output_dir=str(out / "probe"), lora_rank=2, max_train_steps=2,
                       train_batch_size=2, checkpointing_steps=0, eval_num_samples=0, export=False, cpu=True)
    trainer = ToyTrainer(config, accelerator=cpu_fsdp2_accelerator(auto_wrap_policy="no_wrap"))
    shared = trainer.layout.adapters.network
    before = {n: p.detach().clone() for n, p in shared.named_parameters() if "lora_B" in n}
    view = {type(p).__name__ for p in trainer.unwrap("a").parameters()}
    peft = {type(p).__name__ for n, p in shared.named_parameters() if "lora_" in n}
    trainer.train()
    changed = sum(not torch.equal(before[n], p.detach()) for n, p in shared.named_parameters() if n in before)
    if trainer.accelerator.is_main_process:
        print(f"adapter view parameters: {view}; the peft layers' own: {peft}; "
              f"lora_B tensors changed by training: {changed} of {len(before)}")


if __name__ == "__main__":
    (lora_probe if sys.argv[3:] == ["lora-probe"] else main)(sys.argv[1], Path(sys.argv[2]))
