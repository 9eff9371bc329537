"""care-mla: convert GQA language models to multi-head latent attention with CARE."""

from transformers import AutoConfig, AutoModelForCausalLM

from care_mla.formats.configuration_care_mla import CareMlaConfig
from care_mla.formats.modeling_care_mla import CareMlaForCausalLM

AutoConfig.register(CareMlaConfig.model_type, CareMlaConfig, exist_ok=True)
AutoModelForCausalLM.register(CareMlaConfig, CareMlaForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["CareMlaConfig", "CareMlaForCausalLM", "__version__"]
