"""FID / KID / precision-recall / diversity from the shell: ``python eval/fid.py ref|calc ...``.

The same command as ``stepdistill eval`` (see ``stepdistill/commands/eval.py``)::

    python eval/fid.py ref --data digits:heldout --features digits --out refs/digits_heldout.npz
    python eval/fid.py calc --ref refs/digits_heldout.npz --pipeline runs/dmd2/pipeline --class_labels reference
    accelerate launch eval/fid.py calc --ref refs/ffhq.npz --pipeline runs/sdxl_dmd2 --prompts prompts.txt
"""

from stepdistill.commands.eval import main

if __name__ == "__main__":
    main()  # (user errors exit with status 1 from inside)
