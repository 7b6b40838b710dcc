"""Planning m-hyperparameters under a memory budget, and the online retraining loop."""
