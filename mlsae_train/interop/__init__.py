"""Our SAEs in other tools and theirs in ours: SAELens and sparsify folders (export and import), the Hugging Face Hub
(download by repo id, upload with a model card). Each module owns one concern; `exchange` holds the commands' configs.
"""
