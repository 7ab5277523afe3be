"""posttrain.operator: the kopf operator that turns a PostTrainJob into a JobSet."""
