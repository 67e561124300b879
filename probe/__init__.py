"""Knowledge-organisation probe: where along depth a model sorts prompts into categories,
recalls the answer (logit lens) and formats its output, for a teacher and a compressed
student side by side. See run.py for the files it writes, phases.py for the definitions."""
from .collect import Readout, read_model, read_swaps
from .metrics import category_separation, first_entry, layer_table, nearest_centroid_accuracy
from .phases import Phases, detect_phases
from .prompts import Prompt, convert_rome, dfssm_layout, encode, load_prompts
from .run import ProbeOptions, export_prompts, run_probe

__all__ = ["Phases", "ProbeOptions", "Prompt", "Readout", "category_separation", "convert_rome", "detect_phases",
           "dfssm_layout", "encode", "export_prompts", "first_entry", "layer_table", "load_prompts",
           "nearest_centroid_accuracy", "read_model", "read_swaps", "run_probe"]
