"""Every measured figure of the project: one script per benchmark, JSON in results/."""
