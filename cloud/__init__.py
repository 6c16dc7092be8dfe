"""The cloud: a deeper block and classifier that answers every escalated frame."""
