"""speccascade: faster cascades via speculative decoding (Narasimhan et al., ICLR 2025).

    import speccascade as sc
    out = sc.generate(drafter, verifier, input_ids, method="opt", alpha=0.3, gamma=5)
    out.tokens, out.stats

``sc.METHODS`` lists every method by name (see ``speccascade methods`` on the command line).
"""

from .api import GenerationOutput, generate
from .errors import NonFiniteLogitsError, SpecCascadeError
from .registry import METHODS, MethodSpec
from .stats import Stats

__version__ = "0.1.0"

__all__ = ["generate", "GenerationOutput", "METHODS", "MethodSpec", "Stats", "SpecCascadeError",
           "NonFiniteLogitsError", "__version__"]
