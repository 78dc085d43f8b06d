"""Device meshes, logical-to-mesh axis rules, and sharding of pytrees. No model code here."""
