"""One module per `mmcafnet` sub-command."""
