print("kuasar")
