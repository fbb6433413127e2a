import torch

x = 1
raise RuntimeError("this file is broken on purpose")
