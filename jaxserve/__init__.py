"""jaxserve: an LLM inference runtime on JAX/XLA.

Public API: `LLM` (offline generation and chat), `SamplingParams`, and the result types
`RequestOutput` / `CompletionOutput`. The engine underneath is `jaxserve.llm_engine.LLMEngine`.
"""

from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # `LLM` pulls in JAX and the model code; keep `import jaxserve` light for the CLI and server.
    if name == "LLM":
        from jaxserve.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "__version__"]
