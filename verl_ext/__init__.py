"""BuPO for verl: internal layer policies, their training inside verl 0.9.1, analysis and evaluation.

Layer convention used across the package: ``layer`` / ``internal_layer`` is the **0-based** decoder
index k; the paper's internal layer policy pi^{k+1} is the residual stream after decoder module
``model.layers[k]`` pushed through the LM head with **no final norm** (``final_norm=False``).
"""

__version__ = "0.1.0"
