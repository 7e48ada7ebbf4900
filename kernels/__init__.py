"""Hot loops of the project, each with a Triton kernel for CUDA and a plain-torch path for everywhere else."""
