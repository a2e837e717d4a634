"""Generated from protos/flywheel/v1 by scripts/gen_protos.sh. Do not edit."""
