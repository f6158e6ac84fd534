"""The fixture corpus splits; calib.txt and heldout.txt ship as kvcompile.data (the bundled defaults)."""
