import os

# The Triton interpreter must be chosen before triton is first imported;
# kernel tests opt into the Triton path per test with FXC_FORCE_TRITON.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
