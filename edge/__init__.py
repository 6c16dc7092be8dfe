"""The edge: fusion of camera features, the edge block and classifier, the exit rules."""
