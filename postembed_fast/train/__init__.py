"""Training the post-embedding model (needs the train extra: pip install 'postembed_fast[train]').

    data.py      read and validate posts, split them by source
    tasks.py     the labeling tasks: training pairs and evaluation triplets
    recipe.py    model (encoder + Pooling + Dense + Normalize) and sentence-transformers' trainer
    evaluate.py  triplet accuracy with bootstrap intervals (python -m postembed_fast.train.evaluate)
    triplets.py  the triplet file, built deterministically (python -m postembed_fast.train.triplets)
    __main__.py  the one command: python -m postembed_fast.train --data POSTS --out FOLDER

The engine never imports this package; it uses the engine (Embedder) to evaluate and calibrate.
"""
