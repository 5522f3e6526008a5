"""CUDA's launch limits that the launchers check before launching (a grid past them fails at launch with
an opaque CUDA error instead of a ValueError naming the argument)."""

MAX_GRID_YZ = 65535  # the largest y or z size of a grid
