"""Input data: sources and batch formats. Knows nothing of meshes, training or serving."""
