"""Launching experiments: W&B sweep files (sweep.py) and SLURM batch jobs (slurm.py)."""
