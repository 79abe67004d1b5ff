"""Interpreter start-up hook (imported from ``nnyseg_nnunet_ext.pth`` in site-packages).

nnU-Net 2.8 finds trainers outside its own package only through the ``nnUNet_extTrainer`` environment variable,
which it reads once when ``nnunetv2.paths`` is imported. The ``.pth`` file that nnyseg's wheel puts into
site-packages imports :mod:`nnyseg._startup.register_trainer_dir` when Python starts, which appends nnyseg's
trainer folder to that variable. Nothing is copied into nnunetv2's installed tree, and the stock
``nnUNetv2_train -tr nnYNetTrainer`` works in a fresh shell. Set ``NNYSEG_NO_AUTO_EXT_TRAINER=1`` to switch the hook
off; ``nnyseg doctor`` reports what it sees.
"""
