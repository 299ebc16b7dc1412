"""Registers the weight-only PTQ algorithms (``rtn``, ``awq``, ``gptq``, ``hqq``) in the method table,
so that ``lowbit.quantize(model, method="gptq", bits=4, group_size=64, sym=False,
calib_dataset="valid.txt", tokenizer=tok, n_samples=128, seq_len=512)`` works.

Each method is one line: its config class (:mod:`lowbit.config`, which owns the options and their
defaults), the function the block-by-block pipeline (:mod:`lowbit.model.sequential`) runs (per
layer for the data-free ones, per stage of shared statistics for the calibrated ones) and its cost
model for ``lowbit plan`` (:mod:`lowbit.model.plan`).
"""
from __future__ import annotations

from lowbit.config import AWQConfig, GPTQConfig, HQQConfig, RTNConfig
from lowbit.model import plan
from lowbit.model.methods import register_ptq_method
from lowbit.model.sequential import _awq_stage_cfg, _gptq_stage_cfg, _hqq_layer, _rtn_layer

register_ptq_method("rtn", config=RTNConfig, layer=_rtn_layer,
                    cost=plan.Cost(storage=plan.storage_affine, seconds=plan.seconds_rtn),
                    description="round-to-nearest weight-only quantization (no data)")
register_ptq_method("hqq", config=HQQConfig, layer=_hqq_layer,
                    cost=plan.Cost(storage=plan.storage_affine, seconds=plan.seconds_hqq),
                    description="HQQ half-quadratic weight-only quantization (no data)")
register_ptq_method("gptq", config=GPTQConfig, stage=_gptq_stage_cfg,
                    cost=plan.Cost(calibrated=True, hessian=True, storage=plan.storage_affine),
                    description="GPTQ weight-only quantization (calibrated, block by block)")
register_ptq_method("awq", config=AWQConfig, stage=_awq_stage_cfg,
                    cost=plan.Cost(calibrated=True, storage=plan.storage_affine),
                    description="AWQ activation-aware weight-only quantization (calibrated)")
