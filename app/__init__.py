"""The Gradio app of sai-diffusion (``sai-app``): UI only, over the ``sai_diffusion`` library.

``sai-app`` finds this folder through ``sai_diffusion._resources.app_dir()``: beside the
package in a checkout or an editable install, inside it (``sai_diffusion/_app``) in a wheel.
"""
