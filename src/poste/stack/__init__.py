"""The whole stack: `poste init`, `poste up`, `poste doctor`, metrics and logs."""
