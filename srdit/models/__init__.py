"""The SR-DiT transformer (`build_model(model_cfg) -> SRDiT`) and its parts.

Modules: `tables` (sin-cos and RoPE tables, timestep sinusoid), `layers` (embedders, MLPs,
REPA projector, final layer), `attention` (attention with QK-norm / value residual / RoPE, the
adaLN-Zero block), `sprint` (token routing), `sit` (the model).
"""
from srdit.models.sit import ModelOutput, SRDiT, build_model, check_model_config

__all__ = ["ModelOutput", "SRDiT", "build_model", "check_model_config"]
