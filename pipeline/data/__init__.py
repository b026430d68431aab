"""What a run trains on: the addition task, the data files (MNIST IDX, NumPy
archives), and a run's data resolved and loaded from them."""
