"""The attention-shrink (lambda_vit) scripts call `main_lambda.py`; it is the same trainer as main.py."""
import sys

from main import cli

if __name__ == "__main__":
    sys.exit(cli())
