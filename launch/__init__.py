"""The `stripes` command line and the torchrun / Slurm launchers."""
