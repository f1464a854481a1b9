"""The driver process: plan, cluster, the Ray Train trainer, sweeps and k-fold, the winner, the console."""
