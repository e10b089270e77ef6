"""soft-moe-pytorch (lucidrains/soft-moe-pytorch): its SoftMoE and DynamicSlotsSoftMoE -> moe_kernels.nn's, with
the same weights. Recognised by class (they come from that package); the package is never imported from here."""
import sys
from typing import Optional

from torch import nn

from ..nn.soft import DynamicSlotsSoftMoE, SoftMoE


def convert_module(module: nn.Module) -> Optional[nn.Module]:
    """The fused module for a soft_moe_pytorch.SoftMoE or DynamicSlotsSoftMoE instance, else None."""
    package = sys.modules.get("soft_moe_pytorch")
    if package is None:  # not imported: no module can be one of its instances
        return None
    if isinstance(module, package.SoftMoE):
        return SoftMoE.from_soft_moe_pytorch(module)
    if isinstance(module, package.DynamicSlotsSoftMoE):
        return DynamicSlotsSoftMoE.from_soft_moe_pytorch(module)
    return None


def _is_theirs(module: nn.Module) -> bool:
    package = sys.modules.get("soft_moe_pytorch")
    return package is not None and isinstance(module, (package.SoftMoE, package.DynamicSlotsSoftMoE))


def _register_converters() -> None:
    from ..convert import register_converter

    register_converter("soft-moe-pytorch", _is_theirs, convert_module)


_register_converters()  # moe_kernels.convert() imports this module when soft_moe_pytorch is installed
