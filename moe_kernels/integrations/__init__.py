"""Integrations with other libraries. Each lives in its own module and imports its library only when used:
importing moe_kernels (or this package) never imports them.

- `moe_kernels.integrations.transformers`: `experts_implementation="moe_kernels"` for transformers 5.x models,
  and conversion of transformers v4-style sparse MoE blocks to `SparseMoE`.
- `moe_kernels.integrations.soft_moe_pytorch`: conversion of soft-moe-pytorch's SoftMoE and DynamicSlotsSoftMoE.
"""
