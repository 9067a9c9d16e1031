"""The ``pyadvk`` operator namespace. Schemas are declared here, from Python, so every op exists
(and works under torch.compile through its fake kernel) whether or not the compiled library is
built; csrc/ registers CPU and CUDA kernels for them, kernels/ adds Triton ops of their own."""

import torch

LIBRARY = torch.library.Library("pyadvk", "DEF")


def define(schema: str) -> str:
    """Declares ``pyadvk::<schema>`` and returns the qualified name."""
    LIBRARY.define(schema)
    return "pyadvk::" + schema.split("(", 1)[0]
