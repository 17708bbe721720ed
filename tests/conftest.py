import os

# Child processes and this process alike: one thread per rank keeps 2-core CI honest.
os.environ.setdefault("OMP_NUM_THREADS", "1")
