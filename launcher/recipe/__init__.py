"""The recipe: YAML read safely, its typed schema, DeepSpeed's config and ZeRO `auto` (driver and workers)."""
