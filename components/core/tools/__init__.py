"""Planning tools: parameter counts, memory and cost estimates."""
