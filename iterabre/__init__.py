"""iterabre: Iterative Recovery-Aided Block Reduction for Hugging Face decoder LMs.

The library is pure algorithm code (no Prefect, no MLflow): load a model, score its
decoder blocks, remove some, recover with distillation or reconstruction, evaluate.
"""

__version__ = "0.1.0"
