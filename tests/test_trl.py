"""TRL's SFTTrainer with a PEFT LoRA config trains a tiny accelerated transformers FalconMamba on
the CPU: the loss is finite and falls on repeated text, only the adapters change, and every
training step ran through our ops (a counting spy), gradient checkpointing included."""

import pytest
import torch

import falcon_mamba.hf as fh
from falcon_mamba import default_model, ops

transformers = pytest.importorskip("transformers")  # dev dependencies: installed in CI
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def test_sft_trainer_with_lora_on_an_accelerated_model(tmp_path, monkeypatch):
    from tests.test_data import make_text

    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(default_model.path() / "tokenizer.json"),
                                               eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = transformers.FalconMambaConfig(vocab_size=8192, hidden_size=32, num_hidden_layers=2,
                                         intermediate_size=64, state_size=8, time_step_rank=4,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = fh.accelerate(transformers.FalconMambaForCausalLM(cfg))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    scans = []
    real_scan = ops.selective_scan

    def counted(*a, **k):
        scans.append(torch.is_grad_enabled())
        return real_scan(*a, **k)

    monkeypatch.setattr(ops, "selective_scan", counted)
    lines = make_text(3, 8).splitlines()
    train = datasets.Dataset.from_dict({"text": lines * 4})
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4,
                         learning_rate=5e-2, lr_scheduler_type="constant", logging_steps=1,
                         save_strategy="no", report_to="none", use_cpu=True, max_length=32,
                         gradient_checkpointing=True, dataloader_num_workers=0, seed=0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj", "x_proj"], task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok,
                             peft_config=lora)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-2:]) < losses[0]  # it learns the repeated lines
    assert sum(scans) >= 6 * 2 * 2  # every step, forward and checkpoint recomputation, both layers
    tuned = trainer.model.merge_and_unload().state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.endswith(("in_proj.weight", "x_proj.weight")) for k in changed), changed
